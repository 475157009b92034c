"""Built-ins: the answer format, the GSM8K rewards, the arithmetic task, the tiny model and the SFT warm-up."""
