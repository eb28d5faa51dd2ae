"""Process groups and (later) the FSDP2 / ZeRO strategies behind one interface."""
