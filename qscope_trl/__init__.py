"""qscope_trl: thin adapters that bring qscope_hf's SAEs into TRL trainers (callbacks, rewards, losses, rollouts)."""

__all__: list[str] = []
