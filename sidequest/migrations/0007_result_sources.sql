-- The pages a result cites ([{"n", "title", "url"}], in the order of the [n] markers in its text),
-- so a client gets them as data, not only as the "Sources:" list at the end of the text.
ALTER TABLE task_results ADD COLUMN sources JSON;
