"""Model-quality evaluation: building real base/fine-tune pairs and measuring delta fidelity."""
