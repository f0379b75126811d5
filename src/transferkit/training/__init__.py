"""What trains, when and how: fine-tuning strategies, optimizers and schedulers, the callbacks
that carry a resume, interrupts, loggers, the lr finder, DDP and the random state."""
