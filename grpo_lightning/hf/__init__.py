"""Hugging Face plumbing: loading and preparing the policy, LoRA, and the one root module every pass runs through."""
