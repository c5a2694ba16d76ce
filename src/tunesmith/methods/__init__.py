"""Fine-tuning methods behind one interface (base.py); `registry.get_method(name)` picks one.

One module or folder per method with its options and planning terms. Methods may import data, models, config,
records and the bottom helpers; never plan, train, eval, registry, serve, ui or recipes."""
