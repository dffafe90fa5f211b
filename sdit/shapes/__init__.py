"""The shapes world: a small captioned-image world in which the whole method runs on a CPU and can be judged.

Nothing on the Stable Diffusion path imports this package; it is the project's demo and its proof.

    world.py      the procedural generator (shape, colour, background, position, size), the student's limited
                  split with held-out concepts, evaluation prompts and the text-only prompt bank
    evaluator.py  reads a generated image back into its attributes, with a "none of these" answer
    toy.py        the toy SD teacher (SD 1.5's component classes, small) and its trainer (`sdit toy train`)
    samples.py    a teacher's samples of the evaluation prompts and their scores (`sdit toy eval`, the experiment)
"""
