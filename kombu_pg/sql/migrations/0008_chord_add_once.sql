-- Task.add_to_chord() raises a chord's target by one part (chords.done - 1).  The result
-- backend runs a statement again on a new connection when the first one's connection
-- broke, and a commit whose reply was lost then counted the added part twice: the body
-- waited for a part that never came.  The ids of the added tasks are kept with the chord
-- so the same task is counted once, however often its statement runs.

ALTER TABLE {schema}.chords ADD COLUMN added text[];
