"""How the shapes world's shipped weights were made: nothing here runs during RL training.

``base`` pretrains the base model (``make base-model``), ``unified`` the unified model (``make unified-model``),
``loop`` holds what those two share (step-seeded batches, the EMA, resumption, the command-line start-up),
``score`` trains the ``shapes_score`` CLIP (``make reward-model``).
"""
