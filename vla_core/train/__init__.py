"""wmvla.train"""
