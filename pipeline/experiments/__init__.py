"""`sdit bench distill`, `sdit bench substitution` and `sdit bench evaluator`: experiments on the shapes world,
where a toy teacher's knowledge can be scored exactly.

    distill.py       `sdit bench distill` (students with and without the teacher, side by side): its stages
    plan.py          its runs, the labellings they need and their training options
    side_by_side.py  its runs trained side by side, a process each
    scoring.py       its samples, read and scored; learning curves
    plots.py         its pictures: curves and the grid of samples
    report.py        its report in markdown
    substitution.py  `sdit bench substitution` (how many records the teacher is worth)
    reader.py        `sdit bench evaluator` (how well the shapes world's reader reads images it never drew)
"""
