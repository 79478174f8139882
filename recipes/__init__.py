"""Training and evaluation recipes built on :mod:`vec2face_model` (the library never imports them).

Run a recipe as a module or by path (both use this package)::

    python -m recipes.train_fr --help            # ArcFace on HSFace (paper §4)
    python -m recipes.eval_fr --help             # LFW / CFP-FP / CPLFW / AgeDB-30 / CALFW verification
    python -m recipes.train_vec2face --help      # the Vec2Face generator itself
    accelerate launch recipes/train_fr.py ...    # several processes
"""
