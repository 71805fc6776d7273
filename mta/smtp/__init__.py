"""SMTP protocol code: the inbound server (and its ODMR variant, ATRN on
``[gateway] atrn_listen``), the outbound client (also over a connection
turned around by ATRN), and the types they take and give; nothing of
delivery, configuration or SQL."""
