"""Training: the loop, schedule, checkpoints and resume, the callbacks protocol, regularisers.

`train` only trains: it takes a model, packs and callbacks and returns the final state. It may import data (packs,
render), methods (the Method protocol), models, config, records and the bottom helpers — never eval, registry, serve
or recipes; measurements during training arrive as callbacks that the recipe hands it (recipes/finetune.py)."""
