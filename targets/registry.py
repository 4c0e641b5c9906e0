"""Imports every target so that `register_target` has seen them all."""
