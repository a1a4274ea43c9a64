"""Getting images off the truck: the route stage into the durable outbox (:mod:`.route`), the uploader
thread (:mod:`.uploader`) and the destinations (:mod:`.destinations`)."""
