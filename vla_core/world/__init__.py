"""wmvla.world"""
