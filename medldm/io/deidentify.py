"""De-identification of derived DICOM series: the DICOM PS3.15 Annex E **Basic Application Level
Confidentiality Profile** (Table E.1-1, 2024b), applied to the headers medldm writes.

Scope: the attributes a derived image header can carry after :func:`medldm.io.dicom_headers.clean_reference`
(which already removes private attributes, overlays, curves, icons and signatures). Table E.1-1
actions, and the choice made where the table allows several:

* ``X`` remove; ``Z`` empty value; ``D`` dummy value; ``U`` UID replaced by a consistent new one;
* ``Z/D`` -> ``Z``, except Patient ID -> a keyed pseudonym (``D``, the same patient keeps one ID in a run);
* ``X/Z``, ``X/D``, ``X/Z/D`` -> ``X`` (none of them is Type 1/2 in the CT / MR / Secondary Capture
  images medldm writes);
* ``X/Z/U*`` (Source Image / Referenced Image Sequence) -> kept, with every UID inside replaced
  (``U*``), so the derived series still points at the de-identified source;
* attributes not in the table are kept (as the profile says); sequences are processed item by item.

UIDs: ``new = 2.25.<UUID from HMAC-SHA256(secret, old UID)>``. One secret per run (by default one per
process, never stored), so the Study, Frame of Reference and source-image links of every series
written in one run stay consistent, and the mapping cannot be reversed or recomputed later. Pass the
same :class:`Deidentifier` (or the same ``secret``) to keep links across runs.

Dates and times are removed or emptied (the profile without the "Retain Longitudinal Temporal
Information" option); ``LongitudinalTemporalInformationModified`` is ``REMOVED``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medldm import __version__

#: Table E.1-1 (PS3.15 2024b), basic profile column, for attributes an image header can hold.
#: Keyword -> action. Curves (50xx), overlays (60xx), private attributes and the attributes in
#: ``dicom_headers.REMOVED_KEYWORDS`` never reach this step.
PROFILE: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "PatientSex": "Z",
    "PatientBirthTime": "X", "PatientBirthName": "X", "PatientAge": "X", "PatientSize": "X",
    "PatientWeight": "X", "PatientAddress": "X", "PatientMotherBirthName": "X", "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X", "PatientComments": "X", "PatientState": "X", "PatientReligiousPreference": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientPrimaryLanguageCodeSequence": "X",
    "PatientPrimaryLanguageModifierCodeSequence": "X", "PatientSexNeutered": "X/Z", "PatientTransportArrangements": "X",
    "PatientInstitutionResidence": "X", "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X", "IssuerOfPatientID": "X", "MedicalAlerts": "X", "Allergies": "X",
    "AdditionalPatientHistory": "X", "SmokingStatus": "X", "PregnancyStatus": "X", "LastMenstrualDate": "X",
    "EthnicGroup": "X", "Occupation": "X", "MilitaryRank": "X", "BranchOfService": "X", "CountryOfResidence": "X",
    "RegionOfResidence": "X", "MedicalRecordLocator": "X", "InsurancePlanIdentification": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X", "ReferencedPatientSequence": "X",
    "ReferencedPatientAliasSequence": "X", "ReferencedPatientPhotoSequence": "X", "SpecialNeeds": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    # visit / admission
    "AdmissionID": "X", "IssuerOfAdmissionID": "X", "IssuerOfAdmissionIDSequence": "X", "AdmittingDate": "X",
    "AdmittingTime": "X", "AdmittingDiagnosesDescription": "X", "AdmittingDiagnosesCodeSequence": "X",
    "DischargeDiagnosisDescription": "X", "CurrentPatientLocation": "X", "VisitComments": "X",
    "ServiceEpisodeID": "X", "ServiceEpisodeDescription": "X", "IssuerOfServiceEpisodeID": "X",
    "IssuerOfServiceEpisodeIDSequence": "X", "ReasonForVisit": "X", "ReasonForVisitCodeSequence": "X",
    # study
    "StudyInstanceUID": "U", "StudyDate": "Z", "StudyTime": "Z", "StudyID": "Z", "AccessionNumber": "Z",
    "StudyDescription": "X", "StudyComments": "X", "StudyIDIssuer": "X", "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "ConsultingPhysicianName": "Z",
    "ConsultingPhysicianIdentificationSequence": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "RequestingPhysician": "X", "RequestingService": "X",
    "ReasonForStudy": "X", "RequestedProcedureDescription": "X/Z", "RequestedProcedureID": "X",
    "RequestedProcedureComments": "X", "RequestedProcedureLocation": "X", "RequestedContrastAgent": "X",
    "ReasonForTheRequestedProcedure": "X", "ReasonForTheImagingServiceRequest": "X",
    "ImagingServiceRequestComments": "X", "PlacerOrderNumberImagingServiceRequest": "Z",
    "FillerOrderNumberImagingServiceRequest": "Z", "OrderEnteredBy": "X", "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X", "ReferencedStudySequence": "X/Z", "RequestAttributesSequence": "X",
    "StudyArrivalDate": "X", "StudyArrivalTime": "X", "StudyCompletionDate": "X", "StudyCompletionTime": "X",
    "StudyVerifiedDate": "X", "StudyVerifiedTime": "X", "StudyReadDate": "X", "StudyReadTime": "X",
    "ScheduledStudyLocation": "X", "ScheduledStudyLocationAETitle": "X",
    # series / procedure step
    "SeriesInstanceUID": "U", "SeriesDate": "X/D", "SeriesTime": "X/D", "SeriesDescription": "X",
    "ProtocolName": "X/D", "OperatorsName": "X/Z/D", "OperatorIdentificationSequence": "X/D",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X",
    "PerformedProcedureStepID": "X", "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "PerformedStationAETitle": "X", "PerformedStationName": "X", "PerformedLocation": "X",
    "PerformedStationNameCodeSequence": "X", "PerformedStationGeographicLocationCodeSequence": "X",
    "CommentsOnThePerformedProcedureStep": "X", "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepStartDate": "X", "ScheduledProcedureStepStartTime": "X",
    "ScheduledProcedureStepEndDate": "X", "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepLocation": "X", "ScheduledPerformingPhysicianName": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X", "ScheduledStationAETitle": "X",
    "ScheduledStationName": "X", "ScheduledHumanPerformersSequence": "X", "ActualHumanPerformersSequence": "X",
    "HumanPerformerName": "X", "HumanPerformerOrganization": "X", "RequestedSeriesDescription": "X",
    # equipment
    "InstitutionName": "X/Z/D", "InstitutionAddress": "X", "InstitutionCodeSequence": "X/Z/D",
    "InstitutionalDepartmentName": "X", "InstitutionalDepartmentTypeCodeSequence": "X", "StationName": "X/Z/D",
    "StationAETitle": "X", "DeviceSerialNumber": "X/Z/D", "DeviceUID": "U", "GantryID": "X", "GeneratorID": "X",
    "DetectorID": "X/D", "CassetteID": "X", "PlateID": "X", "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X", "DateTimeOfLastCalibration": "X", "DateOfManufacture": "X",
    "DateOfInstallation": "X", "DateOfLastDetectorCalibration": "X/D", "TimeOfLastDetectorCalibration": "X/D",
    "UniqueDeviceIdentifier": "X", "UDISequence": "X", "ModifyingDeviceID": "X",
    "DeviceDescription": "X", "LongDeviceDescription": "X", "RetrieveAETitle": "X", "NetworkID": "X",
    "TimezoneOffsetFromUTC": "X", "SourceManufacturer": "X",
    # image / acquisition
    "SOPInstanceUID": "U", "MediaStorageSOPInstanceUID": "U", "InstanceCreatorUID": "U",
    "FrameOfReferenceUID": "U", "SynchronizationFrameOfReferenceUID": "U", "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U", "ReferencedSOPInstanceUID": "U", "ReferencedSOPInstanceUIDInFile": "U",
    "IrradiationEventUID": "U", "AcquisitionUID": "U", "ConcatenationUID": "U", "DimensionOrganizationUID": "U",
    "PaletteColorLookupTableUID": "U", "LargePaletteColorLookupTableUID": "U", "StorageMediaFileSetUID": "U",
    "TransactionUID": "U", "UID": "U", "FiducialUID": "U", "TargetUID": "U", "TrackingUID": "U",
    "SpecimenUID": "U", "PyramidUID": "U", "ObservationUID": "U", "TemplateExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U", "FailedSOPInstanceUIDList": "U",
    "InstanceCreationDate": "X/D", "InstanceCreationTime": "X/Z/D", "InstanceCoercionDateTime": "X",
    "ContentDate": "Z/D", "ContentTime": "Z/D", "AcquisitionDate": "X/Z", "AcquisitionTime": "X/Z",
    "AcquisitionDateTime": "X/Z/D", "ContentCreatorName": "Z/D", "ContentCreatorIdentificationCodeSequence": "X",
    "AcquisitionComments": "X", "AcquisitionProtocolDescription": "X", "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionContextSequence": "X/Z", "ContrastBolusAgent": "Z/D", "ContrastBolusStartTime": "X",
    "ContrastBolusStopTime": "X", "InterventionDrugStartTime": "X", "InterventionDrugStopTime": "X",
    "RadiopharmaceuticalStartTime": "X", "RadiopharmaceuticalStopTime": "X",
    "RadiopharmaceuticalStartDateTime": "X", "RadiopharmaceuticalStopDateTime": "X", "PreMedication": "X",
    "ImageComments": "X", "FrameComments": "X", "IdentifyingComments": "X", "ImagePresentationComments": "X",
    "DerivationDescription": "X", "ModifiedImageDescription": "X", "ModifiedImageDate": "X",
    "ModifiedImageTime": "X", "DateOfSecondaryCapture": "X", "TimeOfSecondaryCapture": "X",
    "OverlayDate": "X", "OverlayTime": "X", "CurveDate": "X", "CurveTime": "X",
    "SourceImageSequence": "X/Z/U*", "ReferencedImageSequence": "X/Z/U*", "IconImageSequence": "X",
    "GraphicAnnotationSequence": "D", "TextComments": "X", "TextString": "X", "Arbitrary": "X",
    "RespiratoryMotionCompensationTechniqueDescription": "X", "DecompositionDescription": "X",
    "MultienergyAcquisitionDescription": "X", "FrameAcquisitionDateTime": "D", "FrameReferenceDateTime": "D",
    "StartAcquisitionDateTime": "X/D", "EndAcquisitionDateTime": "X/D", "CalibrationDateTime": "Z",
    "DecayCorrectionDateTime": "D", "XRayDetectorID": "D", "XRaySourceID": "D", "XRayDetectorLabel": "X",
    "AcquisitionFieldOfViewLabel": "D",
    # people, signatures, clinical trial, findings
    "PersonName": "D", "PersonAddress": "X", "PersonTelephoneNumbers": "X", "PersonTelecomInformation": "X",
    "PersonIdentificationCodeSequence": "D", "VerifyingObserverName": "D", "VerifyingObserverSequence": "D",
    "VerifyingObserverIdentificationCodeSequence": "Z", "VerifyingOrganization": "D", "AuthorObserverSequence": "X",
    "ParticipantSequence": "X", "CustodialOrganizationSequence": "X", "ContentSequence": "D",
    "DigitalSignaturesSequence": "X", "ReferencedDigitalSignatureSequence": "X", "ReferencedSOPInstanceMACSequence": "X",
    "MAC": "X", "OriginalAttributesSequence": "X", "ModifiedAttributesSequence": "X",
    "ClinicalTrialSponsorName": "D", "ClinicalTrialProtocolID": "D", "ClinicalTrialProtocolName": "Z",
    "ClinicalTrialSiteID": "Z", "ClinicalTrialSiteName": "Z", "ClinicalTrialSubjectID": "D",
    "ClinicalTrialSubjectReadingID": "D", "ClinicalTrialTimePointID": "Z", "ClinicalTrialTimePointDescription": "X",
    "ClinicalTrialCoordinatingCenterName": "Z", "ClinicalTrialSeriesID": "X", "ClinicalTrialSeriesDescription": "X",
    "ClinicalTrialProtocolEthicsCommitteeName": "D", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber": "X",
    "IssuerOfClinicalTrialProtocolID": "X", "IssuerOfClinicalTrialSiteID": "X", "IssuerOfClinicalTrialSubjectID": "X",
    "Impressions": "X", "ResultsComments": "X", "InterpretationText": "X", "InterpretationAuthor": "X",
    "InterpretationDiagnosisDescription": "X", "InterpretationRecorder": "X", "InterpretationTranscriber": "X",
    "InterpretationApproverSequence": "X", "PhysicianApprovingInterpretation": "X",
    "DistributionName": "X", "DistributionAddress": "X", "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X", "CommentsOnRadiationDose": "X",
    "LabelText": "X/Z", "BarcodeValue": "X/Z", "SpecimenAccessionNumber": "X", "SlideIdentifier": "X",
    "ContainerIdentifier": "D", "SpecimenIdentifier": "D", "SpecimenShortDescription": "X",
    "SpecimenDetailedDescription": "X", "ReviewerName": "X/Z",
    "TopicTitle": "X", "TopicSubject": "X", "TopicAuthor": "X", "TopicKeywords": "X",
}

#: ``Basic Application Confidentiality Profile`` (CID 7050).
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

_TAGS = {tag_for_keyword(k): a for k, a in PROFILE.items() if tag_for_keyword(k) is not None}

_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "PN": "ANONYMOUS", "AS": "000Y",
          "DS": "0", "IS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0}

_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}

_PROCESS_SECRET = secrets.token_bytes(32)


class Deidentifier:
    """Applies :data:`PROFILE` to datasets; UIDs and patient IDs map consistently for one ``secret``."""

    def __init__(self, secret: bytes | str | None = None):
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = _PROCESS_SECRET if secret is None else bytes(secret)

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        """The replacement of UID ``old``: ``2.25.<version-4 UUID from a keyed hash>``; the same for the same
        ``old`` and secret, unrelated to ``old`` without the secret."""
        old = str(old).strip()
        if not old:
            return old
        return "2.25." + str(uuid.UUID(bytes=self._digest("uid", old)[:16], version=4).int)

    def pseudonym(self, value: str) -> str:
        """A consistent patient pseudonym (``MEDLDM-`` + 12 hex digits) for a non-empty identifier."""
        return "MEDLDM-" + self._digest("patient", str(value).strip()).hex()[:12].upper()

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its sequences) and mark it; returns ``ds``."""
        self._apply(ds, top=True)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = (f"medldm {__version__}: DICOM PS3.15 E.1 Basic Application Level "
                                     "Confidentiality Profile")[:64]
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        return ds

    def _apply(self, ds: Dataset, top: bool) -> None:
        for elem in list(ds):
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            action = _TAGS.get(elem.tag)
            if action is None:
                if elem.VR == "SQ":
                    for item in elem.value:
                        self._apply(item, top=False)
                continue
            if action == "U":
                vals = elem.value if elem.VM > 1 else [elem.value]
                new = [self.uid(v) for v in vals if v]
                elem.value = new if elem.VM > 1 else (new[0] if new else "")
            elif action == "X/Z/U*":
                for item in elem.value:
                    self._apply(item, top=False)
            elif elem.keyword == "PatientID" and top:
                elem.value = self.pseudonym(elem.value) if elem.value else ""
            elif elem.keyword == "PatientName" and top:  # same pseudonym as the ID (Z allows a dummy)
                pid = ds.get("PatientID", "")
                elem.value = self.pseudonym(pid) if pid else ""
            elif action in ("Z", "Z/D"):
                elem.value = Sequence() if elem.VR == "SQ" else "" if elem.VR in _STRING_VRS else None
            elif action == "D":
                if elem.VR == "SQ":
                    del ds[elem.tag]  # no meaningful dummy items: removed (X is always compatible in images)
                else:
                    elem.value = _DUMMY.get(elem.VR, "ANONYMOUS")
            else:  # "X" and any choice that includes X
                del ds[elem.tag]


def deidentify(ds: Dataset, secret: bytes | str | None = None) -> Dataset:
    """Apply the basic profile to ``ds`` in place with a one-off :class:`Deidentifier`."""
    return Deidentifier(secret).apply(ds)
