"""Stage 3b, scoring with a model run: the probes' runners, above `mechhi.trace`.

`probes` holds the scoring math (a store's maps or a run's arrays in, labelled xarray
out) and imports nothing above the store. What needs the model run, or several probes
at once, lives here: `registry` (every probe's name, what it needs, how it scores),
`probe_scores` (all probes of one store side by side), `pursuit` (`mechhi pursuit`: head
writes over a dataset, then SOMP), `grounding` (`mechhi ground`), `head_sets` (top /
bottom / matched random head sets from a ranking).
"""
