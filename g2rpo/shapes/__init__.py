"""The embedded shapes world: a GenEval in miniature that pretrains and RL-trains on 2 CPU cores.

What a run uses: ``world`` renders scenes with ground truth, ``prompts`` holds GenEval's six tasks and the
splits, ``geneval`` the detector and GenEval's scoring rules (the ``geneval_shapes`` reward), ``score`` the
learned ``shapes_score`` reward, ``model`` the SD3-architecture base model, ``unified`` the unified model and
``policy`` its policy, ``vqa`` the questions about scenes, ``pairug`` PairUG's pairs (with ``completion``,
their captions and questions). ``training/`` holds the scripts that made the shipped ``weights/``.
"""
