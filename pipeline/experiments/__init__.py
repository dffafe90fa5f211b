"""`sdit bench distill`, `sdit bench substitution` and `sdit bench evaluator`: experiments on the shapes world,
where a toy teacher's knowledge can be scored exactly.

    distill.py       `sdit bench distill` (students with and without the teacher, side by side)
    substitution.py  `sdit bench substitution` (how many records the teacher is worth)
    reader.py        `sdit bench evaluator` (how well the shapes world's reader reads images it never drew)
"""
