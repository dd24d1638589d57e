"""The applications behind ``python -m sals``: ``demo``, ``calibrate``, ``bench`` (the decode
operator, ``generate`` end to end and its dense baselines) and ``eval``, with what they share
(argument parsing). Not library API: the library is ``sals`` and the drop-in
``sals.hf``; these modules may change between releases."""
