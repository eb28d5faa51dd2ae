"""Submit side: profiles + recipes → JobPlan → sbatch text / submitit. Never imports torch."""
