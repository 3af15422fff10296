"""wmvla.envs"""
