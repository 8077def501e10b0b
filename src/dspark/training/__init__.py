"""Training DSpark drafters: data (prompts, regenerated responses, masked sequences) and trainer."""
