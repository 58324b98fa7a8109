"""Front ends: Hugging Face ``Trainer`` (and TRL's ``SFTTrainer`` when installed)."""
from .trainer import CURVATURE_FILE, LaLoRATrainer, LaLoRATrainerMixin, make_lalora_trainer

__all__ = ["LaLoRATrainerMixin", "LaLoRATrainer", "make_lalora_trainer", "CURVATURE_FILE"]
