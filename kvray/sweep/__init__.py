"""Everything that touches Ray: the sweep driver, worker actors, the collector, placement, cluster launch."""
