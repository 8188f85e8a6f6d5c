"""The embedded shapes world: a GenEval in miniature that pretrains and RL-trains on 2 CPU cores.

``world`` renders scenes with ground truth, ``prompts`` holds GenEval's six tasks and the splits,
``geneval`` the detector and GenEval's scoring rules (the ``geneval_shapes`` reward), ``clip`` the learned
``shapes_score`` reward, ``model`` and ``pretrain`` the SD3-architecture base model.
"""
