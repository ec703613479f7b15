"""Integrations of pyfinetune with other libraries, each in its own module and imported on demand
(``import pyfinetune`` never imports them):

* ``pyfinetune.integrations.hf``: Hugging Face ``transformers``: ``DistillationTrainer`` and
  ``l2sp_adamw``. Needs ``pip install "pyfinetune[hf]"``.
"""
