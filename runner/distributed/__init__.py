"""What the distributed server and client processes (runner/server.py, runner/client.py)
share: the MQTT wire protocol (:mod:`.protocol`) and its typed control messages
(:mod:`.control`), the transport and its MQTT client libraries (:mod:`.transport`,
:mod:`.mqtt_link`, :mod:`.mqtt_paho`, :mod:`.mqtt_native`), the broker (:mod:`.broker`), the
server's repair policy (:mod:`.repair`) and the processes' start-up options
(:mod:`.runtime`)."""
