"""The engine: a ``HookSpec`` compiled once (``plan``), hooks that record each forward
(``recorder``), and the runner of the main branch and every extra pass (``runner``), with the
checks of a step's inputs (``inputs``), of what the model gives back (``outputs``) and the
state the branches must not disturb (``rng``). ``masksd.MaskedSelfDistill`` drives it."""
