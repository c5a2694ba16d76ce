"""Fine-tuning methods behind one interface (see base.py); `registry.get_method(name)` picks one."""
