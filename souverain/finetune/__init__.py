"""Fine-tuning on the user's own data: LoRA SFT and DPO, checkpoints that resume exactly,
adapters in PEFT and mistral-finetune formats, merging, and the jobs that run it all."""
