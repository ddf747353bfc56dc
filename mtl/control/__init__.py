"""Controllable multi-task models: width configurations, their cost, training and search."""
