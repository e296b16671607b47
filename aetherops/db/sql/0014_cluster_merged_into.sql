-- The cluster a merged one's alerts moved to (MergeClusters). Written only by the merge, which also
-- closes the cluster; NULL for every other cluster, so adding the column rewrites nothing.
ALTER TABLE clusters ADD COLUMN merged_into text;
