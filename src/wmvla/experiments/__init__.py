"""wmvla.experiments"""
