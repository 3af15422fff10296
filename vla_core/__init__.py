"""wmvla: does a predicted world signal, given to a VLA policy as external memory, improve control?

Package layout follows the data: data -> world -> policy -> train -> envs -> eval -> experiments,
with cli.py on top. Nothing imports backwards; `vla_core.utils` is the shared bottom layer.
"""

__version__ = "0.1.0"
