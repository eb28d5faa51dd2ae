"""Process groups, and the FSDP2 / ZeRO strategies behind one interface (`strategy.STRATEGIES`)."""
