from twisted.application.service import ServiceMaker

mta = ServiceMaker("mta", "mta.tap", "Mail transfer agent: ESMTP server with a durable spool", "mta")
