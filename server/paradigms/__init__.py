"""Coordinator workflows of the learning paradigms (one module each; see :mod:`common.paradigms`)."""
