"""StableReinforce inside the RL trainers people already use.

One module per trainer, each importing only its own package (imported on demand):
``r1reward.integrations.verl`` (a registered policy loss and a filtered advantage
estimator) and ``r1reward.integrations.trl`` (a ``GRPOTrainer`` subclass). Each is tested
against the real installed package (``tests/test_integrations_*.py``).
"""
