"""The shapes world: a small captioned-image world in which the whole method runs on a CPU and can be judged.

Nothing on the Stable Diffusion path imports this package; it is the project's demo and its proof.

    world.py      the procedural generator (shape, colour, background, position, size), the student's limited
                  split with held-out concepts, evaluation prompts and the text-only prompt bank
    reader.py     reads a generated image back into its attributes, with a "none of these" answer
    templates.py  the reader's references (shape templates, palette hues), built from the world's drawing code
    scores.py     accuracy and fair concept scores of readings against what the prompts asked for
    probes.py     images to test the reader on: perturbed renders, independent drawings, images of no shape
    files.py      a split and a prompt list written as the files `sdit encode` reads
    toy.py        the toy SD teacher (SD 1.5's component classes, small) and its trainer (`sdit toy train`)
    samples.py    a teacher's samples of the evaluation prompts and their scores (`sdit toy eval`, the experiment)
"""
