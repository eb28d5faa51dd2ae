"""The training loop and its pure maths: loss, schedules, steps, EMA."""
