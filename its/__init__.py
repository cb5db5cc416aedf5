"""Feedback-Edit inference-time scaling (ITS): the system the Edit model is one part of.

    policy -> N responses -> Feedback model -> F feedback each -> keep up to 3 (random | keywords)
           -> Edit model -> E edits per kept set -> Select model scores every candidate -> the best

its.loop (the `its` stage), its.feedback (which feedback is kept), its.models (generation and scoring
clients with their caches), its.evaluate (`its-eval`: pairwise judge of two runs), launcher.its_job (one
model server per model inside a SLURM job). docs/its.md has the
procedure and its sources.
"""
