"""The torch-free edge to the host a job runs on: the job environment, Slurm queries, atomic files."""
