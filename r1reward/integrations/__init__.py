"""StableReinforce inside the RL trainers people already use.

One module per trainer, each importing only its own package (import the one you need):
``r1reward.integrations.trl`` (a ``GRPOTrainer`` subclass), ``.verl`` (a registered
policy loss and filtered advantage estimators), ``.openrlhf`` (a ``PolicyLoss``
drop-in) and ``.hf`` (a ``transformers.Trainer`` whose ``compute_loss`` is the fused
loss). Each is tested against the real installed package (``tests/test_integrations_*``).
"""
