"""Text reasoning worlds for RL on language models: tiny tasks with verifiable answers, trained here."""
