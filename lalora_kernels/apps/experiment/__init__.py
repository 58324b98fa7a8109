"""``lalora experiment``: LaLoRA against the anti-forgetting methods a peft user can pick, on a real corpus."""
