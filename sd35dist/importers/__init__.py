"""Configs from other trainers, turned into sd35dist recipes."""
