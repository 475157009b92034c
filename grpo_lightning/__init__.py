"""GRPO (Group Relative Policy Optimization) fine-tuning of small language models on GSM8K.

GRPO is the policy-gradient method of Shao et al., "DeepSeekMath" (arXiv:2402.03300); the training
process follows Andriy Burkov's "GRPO from Scratch" (theLMbook, GRPO.py).
"""

__version__ = "0.1.0"
