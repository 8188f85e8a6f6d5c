"""Evaluations of trained policies beyond the training rewards: public benchmarks read from local files."""
