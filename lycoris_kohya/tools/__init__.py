"""``lycoris-kohya`` (or ``python -m lycoris_kohya``): inspect, resize, merge, convert and extract
adapter files, on the same math definitions the training uses. One module per subcommand; keymap.py
and checkpoint.py read and write base models, lowrank.py turns dense differences into LoCon."""
